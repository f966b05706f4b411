"""Model sources: where a model's weights come from, the embedded tiny model, writing HF directories."""
