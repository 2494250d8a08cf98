"""Configuration of the tiny stand-in for briaai/RMBG-1.4 (same name and fields as the real one).

Copied next to `briarmbg.py` into a tiny snapshot, where transformers' remote-code loader
imports it as `.MyConfig`, exactly as it does for the real repository.
"""

from transformers import PretrainedConfig


class RMBGConfig(PretrainedConfig):
    model_type = "SegformerForSemanticSegmentation"

    def __init__(self, in_ch=3, out_ch=1, **kwargs):
        self.in_ch = in_ch
        self.out_ch = out_ch
        super().__init__(**kwargs)
