"""Exercise stubs that `python -m tinyllama.course start <lesson>` copies into the learner's
workspace. They import, but every body raises NotImplementedError until the learner fills it."""
