"""What the kernel tests share: the device, and the dtypes each kernel is checked in there."""
import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's interpreter loads bf16 wrongly, so bf16 is checked on a GPU only
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
