"""How tests/data/synchformer_keys.json was made: from av-benchmark's own Synchformer module tree.

    git clone https://github.com/hkchengrex/av-benchmark /tmp/av-benchmark
    pip install --target /tmp/refdeps einops omegaconf
    python tests/data/derive_synchformer_keys.py /tmp/av-benchmark tests/data/synchformer_keys.json

The release (MMAudio's synchformer_state_dict.pth) is what av-benchmark loads into this tree with
strict=True. timm (which needs torchvision) is replaced by the two helpers the tree uses at
construction (initialisers only), and names newer transformers releases dropped are filled in
with inert stand-ins; neither changes a parameter's name or shape. Not part of the project's code.
"""
import json
import sys
import types

import torch


def main(reference: str, out: str, deps: str = "/tmp/refdeps") -> None:
    sys.path[:0] = [reference, deps]
    layers = types.ModuleType("timm.layers")
    layers.trunc_normal_ = lambda t, std=1.0, **k: t
    layers.to_2tuple = lambda x: (x, x)
    sys.modules["timm"], sys.modules["timm.layers"] = types.ModuleType("timm"), layers
    import transformers.pytorch_utils as pu
    import transformers.utils as tu

    for name in ("find_pruneable_heads_and_indices", "prune_linear_layer"):
        if not hasattr(pu, name):
            setattr(pu, name, None)
    for name in ("add_code_sample_docstrings", "add_start_docstrings", "add_start_docstrings_to_model_forward"):
        if not hasattr(tu, name):
            setattr(tu, name, lambda *a, **k: (lambda f: f))
    from av_bench.synchformer.synchformer import Synchformer

    state = Synchformer().state_dict()
    with open(out, "w") as f:
        f.write("{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(list(v.shape))}" for k, v in state.items())
                + "\n}\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
