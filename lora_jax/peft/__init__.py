"""HuggingFace PEFT interop: our adapters as PEFT LoRA folders, and PEFT folders as ours.

    >>> import lora_jax as lj
    >>> lj.peft.CONFIG_FILE
    'adapter_config.json'
"""

from lora_jax.peft._files import CONFIG_FILE, export_peft as export_adapter, import_peft as import_adapter
from lora_jax.peft._module_map import ModuleMap, ModuleRule

__all__ = ["CONFIG_FILE", "ModuleMap", "ModuleRule", "export_adapter", "import_adapter"]
