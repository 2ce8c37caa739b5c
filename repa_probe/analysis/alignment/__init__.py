"""The alignment analysis: CKNNA / k-NN / CKA against an encoder's features and the spatial-structure
metrics (LDS, CDS, SRSS, RMSC) per block × timestep (:func:`~repa_probe.analysis.alignment.run.run_alignment`),
and its figures."""
