"""Stage 3, a run answering: loading, classifying, nearest patterns and images, unseen patches, batch results, reports and pictures."""
