"""Model factories: tiny test models built from configs, and the embedded real LM."""
