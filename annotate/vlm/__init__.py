"""Vision-language model plumbing shared with evaluation: clients, server, decoding, judge."""
