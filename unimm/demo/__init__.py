"""``unimm demo``: a small unified model trained from scratch on procedural shapes, end to end.

``data``: the images, captions, word tokenizer and the rule-based judge; ``tokenizer``: the patch
image tokenizer (VQ codes and continuous patch tokens); ``report``: the PNGs, metrics.json and
summary table; ``train``: the training and evaluation pipeline behind the command.
"""
