"""How tests/data/msclap_2023_keys.json was made: from msclap 1.3.4's own CLAP module tree (2023 config).

    pip download msclap==1.3.4 --no-deps -d /tmp/msclap && unzip /tmp/msclap/*.whl -d /tmp/msclap/x
    pip install --target /tmp/tl --no-deps torchlibrosa==0.1.0
    python tests/data/derive_msclap_keys.py /tmp/msclap/x /tmp/tl tests/data/msclap_2023_keys.json

msclap's package __init__ imports torchaudio, so its ``models`` subpackage is loaded under an empty
package. Its TextEncoder downloads GPT-2 (``AutoModel.from_pretrained('gpt2')``); the tree is the same
as transformers' GPT2Model with GPT-2 small's config (the default GPT2Config), built here on the meta
device. CLAP_weights_2023.pth holds ``{'model': <this state dict>}``. Not part of the project's code.
"""
import json
import sys
import types

import torch


def main(reference: str, deps: str, out: str) -> None:
    sys.path.insert(0, deps)
    for name, path in (("msclap", "msclap"), ("msclap.models", "msclap/models")):
        module = types.ModuleType(name)
        module.__path__ = [f"{reference}/{path}"]
        sys.modules[name] = module
    from msclap.models.clap import AudioEncoder, Projection
    from transformers import GPT2Config, GPT2Model

    # config_2023.yml: HTSAT, out_emb 768, d_proj 1024, 44100 Hz, window 1024, hop 320, 64 mels, 50-8000 Hz
    keys = {f"audio_encoder.{k}": list(v.shape) for k, v in
            AudioEncoder("HTSAT", 768, 1024, 44100, 1024, 320, 64, 50, 8000, 527).state_dict().items()}
    with torch.device("meta"):
        gpt2 = GPT2Model(GPT2Config())
    keys.update({f"caption_encoder.base.{k}": list(v.shape) for k, v in gpt2.state_dict().items()})
    keys.update({f"caption_encoder.projection.{k}": list(v.shape) for k, v in Projection(768, 1024).state_dict().items()})
    keys["logit_scale"] = []
    with open(out, "w") as f:
        json.dump(keys, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
