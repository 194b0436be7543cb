from .evaluate import evaluate

__all__ = ["evaluate"]
