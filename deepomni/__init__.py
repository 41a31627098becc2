"""DeepOmni: native speech-text Mixture-of-Experts language models on Ray."""

__version__ = "0.1.0"
