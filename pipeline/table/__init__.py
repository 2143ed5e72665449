"""The run's table: what training grows and queries read.

The vocabulary (key -> row) and its compiled count tables, the pooling kernel (a bag of rows
with weights -> one vector), the pattern table (patterns.parquet), the FAISS pattern and image
indexes, and the weights file (model.safetensors read as numpy). Training writes these into a
run directory, learning in steps extends them, and queries read them; training and query meet
only there.
"""
