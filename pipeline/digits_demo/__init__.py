"""The bundled digits demo: real data shipped inside scikit-learn, no download, minutes on a CPU.

- :mod:`pipeline.digits_demo.data`: digits shards, a CoOp-layout few-shot set and a tiny CLIP backbone
  trained on the shards with open_clip's own trainer (``python -m pipeline.digits_demo.data``);
- :mod:`pipeline.digits_demo.inputs`: their frozen features and clustering, the stage-1 demo inputs
  (what ``python -m pipeline.pretrain`` with no arguments runs on);
- :mod:`pipeline.digits_demo.run`: stage 1, then stage 2 for 5 methods x 3 seeds, then the report
  (``python -m pipeline.digits_demo``, ``make demo``).
"""
