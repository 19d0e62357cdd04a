"""A quantized frozen base (QLoRA): kernels stored as int8, int4 or NF4 codes with
per-group float32 scales, optionally double-quantized, as plain pytrees.

`quantize` replaces chosen kernels of a params tree by `QuantizedKernel`s (4-bit codes
packed two per byte: 0.5 byte per weight plus the scales); `dequantize` gives a float
kernel back, cheaply enough to call at every use under `jax.jit`; `nbytes` and `errors`
report what that saved and what it cost. `loftq` quantizes the adapted kernels and starts
their adapters at what quantization lost (LoftQ); `merge` folds adapters into a quantized
base, optionally quantizing the merged kernels again.

We write our own format rather than use qwix: qwix has no double quantization, stores
4-bit codes one per byte (`jnp.int4`/`jnp.uint4`, and uint4 cannot be saved with orbax),
and would add dependencies (opt_einsum, absl) for about a hundred lines of arithmetic.

    >>> import jax, lora_jax as lj
    >>> params = {"params": {"fc": {"kernel": jax.random.normal(jax.random.key(0), (256, 64))}}}
    >>> q = lj.quant.quantize(params, "nf4", group_size=64)
    >>> round(lj.quant.nbytes(q) / lj.quant.nbytes(params), 4)
    0.1406
"""

from lora_jax.quant._kernel import QuantizedKernel, dequantize, is_quantized, quantize_kernel
from lora_jax.quant._loftq import loftq
from lora_jax.quant._merge import Merged, merge
from lora_jax.quant._tree import dequantize_tree, errors, nbytes, quantize

__all__ = [
    "Merged",
    "QuantizedKernel",
    "dequantize",
    "dequantize_tree",
    "errors",
    "is_quantized",
    "loftq",
    "merge",
    "nbytes",
    "quantize",
    "quantize_kernel",
]
