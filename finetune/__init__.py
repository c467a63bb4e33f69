"""Training: LoRA fine-tuning, merging, the tiny models and the CPU demo, on the shared ground in core/."""

import core  # noqa: F401 - installs core's warning filter before any command imports transformers
