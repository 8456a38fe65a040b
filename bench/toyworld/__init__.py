"""An offline toy vision-language world in which CMKD and RST can be seen to work.

world.py draws the images, teacher.py pre-trains a tiny CLIP in it, run.py runs `uda-train`
for every transfer task and prints the paper-style table (README.md; RESULTS.md).
"""
