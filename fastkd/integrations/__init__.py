"""Integrations with other libraries (imported on use: ``fastkd.integrations.transformers``)."""
