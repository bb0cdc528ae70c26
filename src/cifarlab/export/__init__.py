"""``cifarlab export``: take a trained model anywhere, and prove the copy computes the same.

* ONNX (:mod:`.onnx`) and ``torch.export`` ``.pt2`` (:mod:`.pt2`) of one graph
  (:mod:`.wrapper`): uint8 RGB pixels in, logits out, the normalisation inside;
* a Hugging Face-style folder (:mod:`.hf`, model card in :mod:`.card`, numbers from
  :mod:`.results`) that ``cifarlab.load_pretrained`` loads;
* every export verified against its checkpoint (:mod:`.verify`) before it is kept
  (:mod:`.pipeline`), and again on demand with ``--check``; the metadata that ties an
  export to its checkpoint is in :mod:`.source`; the CLI glue in :mod:`.command`.

Nothing is imported here: ``import cifarlab.export.command`` stays cheap.
"""
