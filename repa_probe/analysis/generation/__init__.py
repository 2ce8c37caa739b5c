"""Generation: sampling checkpoints to image folders (:mod:`~repa_probe.analysis.generation.generate`) and the
FID / FD / IS / KID evaluation of those folders (:mod:`~repa_probe.analysis.generation.fid`)."""
