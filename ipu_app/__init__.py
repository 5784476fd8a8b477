"""DynSparse BERT: dynamic block-sparse pre-training of BERT on CPU, GPU and IPU."""

__version__ = "0.1.0"
