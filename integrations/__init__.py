"""Glue between nfn-plugins and the Hugging Face / PyTorch ecosystem (imported as ``nfn_plugins.integrations``)."""
