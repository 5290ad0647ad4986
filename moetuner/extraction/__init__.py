"""Routing-trace extraction from Hugging Face MoE checkpoints (`moetuner-extract`)."""
