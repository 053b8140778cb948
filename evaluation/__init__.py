"""The IFG benchmark: generation runners, metrics (IFS rate, AP, CLIP score, FID) and reports."""
