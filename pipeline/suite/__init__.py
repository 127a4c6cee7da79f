"""The style-shifted base-to-new benchmark ("the suite"): glyphs rendered from matplotlib's fonts,
scikit-learn's handwritten digits and Fashion-MNIST, as a clean caption corpus for a tiny backbone,
style-shifted few-shot sets (base/new) and two stage-1 corpora (``matched`` and ``clean``), all offline.

Modules: :mod:`pipeline.suite.glyphs` (fonts, concepts, confusable groups, rendering),
:mod:`pipeline.suite.styles` (image style operators) and :mod:`pipeline.suite.data` (the build).
"""
