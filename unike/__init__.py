"""unike: UniKE multimodal knowledge editing for any Hugging Face VLM, through forward hooks."""

__version__ = "0.1.0"
