"""`kdtrain`: the student trainer. Reads shards through `ar2mdm.shared`; never imports `ar2mdm.precompute`."""
