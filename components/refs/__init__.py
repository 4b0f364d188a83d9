"""Models by reference, shared by every stage that reads a model: resolving a reference (a published output,
a stage root, a release, `models:/NAME@ALIAS`) and loading it (`models`), the checkpoint and model
directory layout (`checkpoint`), and where a model came from and what it cost (`lineage`)."""
