"""Planning: a model's facts, the GPU memory and throughput models, the hardware catalog, the plan and its report."""
