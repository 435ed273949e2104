"""Op handlers; importing this package registers every one of them."""
from . import conv, elementwise, linear, norm, pool, reshape, sequence, shape  # noqa: F401
