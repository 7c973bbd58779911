"""Built-in aggregation methods; importing this package registers each one."""

from fedlora.aggregation.methods import (  # noqa: F401  (imported for registration)
    fedex_lora,
    fedit,
    fedsa_lora,
    ffa_lora,
    flora,
    flora_na,
    svd,
)
