"""What the kernel tests share: the device, and the dtypes each kernel is checked in there."""
import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's interpreter loads bf16 wrongly, so bf16 is checked on a GPU only
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


def transformer_case(checkpoint):
    """The tiny 5B-layout transformer (RoPE) on DEV, with one small input: (model, x, text, t)."""
    from cogrt.engine.loader import load_transformer
    model = load_transformer(checkpoint("5b") / "transformer").to(DEV)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, model.cfg.in_channels, 6, 10, generator=g).to(DEV)
    text, t = torch.randn(1, 226, model.cfg.text_embed_dim, generator=g).to(DEV), torch.tensor([900], device=DEV)
    return model, x, text, t
