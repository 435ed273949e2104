"""Op handlers; importing this package registers every one of them."""
from . import (  # noqa: F401
    conv,
    elementwise,
    expand,
    fused_attention,
    linear,
    nbits,
    norm,
    padding,
    pool,
    qoperator,
    quantize,
    recurrent,
    reshape,
    sequence,
    shape,
    split_slice,
)
