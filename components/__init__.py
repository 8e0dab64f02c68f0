"""Pipeline steps: plain-Python logic with a thin KFP wrapper per module."""
