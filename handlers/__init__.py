"""Events in, results out: everything between a Cloud Storage event and a result in the bucket."""
