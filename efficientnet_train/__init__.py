"""Fine-tune a timm EfficientNet on a folder of labelled images, as a SageMaker training job."""

__version__ = "0.1.0"
