"""univg: few-shot 2D vessel segmentation from a generative data-engine foundation model."""

__version__ = "0.1.0"
