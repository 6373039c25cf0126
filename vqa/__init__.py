"""medvqa's VQA library: data, vocabularies, training, evaluation, bundles and the CLI."""
__version__ = "0.1.0"
