"""recipes_core.finetune with torch.optim.AdamW(fused=True): the one-line change the recipe needed on CPU,
tried here without editing the recipe. The recipe has since made fused=True its default (commit cc7d8ea),
so this wrapper now runs the same optimizer as the recipe; it stays so the RESULTS.md rows it measured
(taken before that change) can be reproduced.

    torchrun --nproc_per_node 2 -m benchmarks._fused_finetune --config ... (same arguments as recipes_core.finetune)
"""

import torch


class FusedAdamW(torch.optim.AdamW):
    def __init__(self, params, *args, **kwargs):
        kwargs.setdefault("fused", True)
        super().__init__(params, *args, **kwargs)


torch.optim.AdamW = FusedAdamW  # finetune looks it up at call time

if __name__ == "__main__":
    from recipes_core.finetune import main

    main()
