"""The maths and model plumbing, free of Beam: decoding, sidecars, CAMs, boxes, metrics, synthetic data."""
