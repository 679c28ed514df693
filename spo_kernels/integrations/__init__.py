"""Integrations with the libraries users train with (each imported on demand, never by ``spo_kernels``):

    spo_kernels.integrations.hf      fused log-probs / loss inside a Hugging Face causal LM's own forward
    spo_kernels.integrations.anchor  SPO's "one_step" anchor for a Hugging Face causal LM
    spo_kernels.integrations.trl     SPOConfig / SPOTrainer, drop-in for TRL 1.16's DPOConfig / DPOTrainer

``hf`` and ``anchor`` need ``transformers``; ``trl`` needs ``trl`` (``pip install "spo-kernels[trl]"``).
"""
