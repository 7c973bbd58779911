"""Built-in aggregation methods; importing this package registers each one."""

from fedlora.aggregation.methods import (  # noqa: F401  (imported for registration)
    fedask,
    fedex_lora,
    fedit,
    fedrot_lora,
    fedsa_lora,
    fedsvd,
    ffa_lora,
    flora,
    flora_na,
    flora_na_stable,
    rolora,
    svd,
    svd_ef,
)
