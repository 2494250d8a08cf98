"""The GPU performance bench: stock diffusers vs imagen on the same models, inputs and seed.

    configs   the models: full-size architectures (random weights) or the tiny ones, in a
              Hugging Face cache layout both paths read
    cases     what is run (issue 7's cases, and their tiny versions) and the two paths
    timing    warm-up, then the median of timed runs; peak GPU memory, allocated and reserved
    compare   each case on both paths, one model on the device at a time
    cold      a fresh process until ready (child: timing a process to its ready line, no torch)
    report    the table and the JSON in bench/results/
    cost      dollars per 1000 images from a results file
    cli       `python -m bench`

bench/README.md says how to run it and what each column means.
"""
