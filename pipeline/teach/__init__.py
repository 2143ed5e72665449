"""Teaching a loaded run one image at a time, in memory (:mod:`pipeline.teach.learn`), and writing
what it learned as a new run directory (:mod:`pipeline.teach.save`)."""
