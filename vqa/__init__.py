"""medvqa's VQA library: data, vocabularies, training, evaluation, bundles and the CLI."""
__version__ = "0.1.0"

__all__ = ["Prediction", "Predictor", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import vqa` (and `medvqa --help`) does not import torch.
    if name in ("Predictor", "Prediction"):
        from . import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'vqa' has no attribute {name!r}")
