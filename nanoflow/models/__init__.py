"""Model definitions (our own code, never transformers' modeling), their registry and loaders."""
