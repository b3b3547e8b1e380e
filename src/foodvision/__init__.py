"""FoodVision: a reproducible DVC pipeline for transfer-learning image classifiers."""
