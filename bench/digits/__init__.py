"""MNIST -> MNIST-M with real data: a real-data proof of CMKD + RST through the real `uda-train`.

data.py writes the domains, fonts.py renders the teacher's pre-training digits, teacher.py
pre-trains a tiny CLIP on them, run.py runs `uda-train` per method and prints the table
(README.md).
"""
