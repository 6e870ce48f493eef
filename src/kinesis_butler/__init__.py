"""kinesis-butler: consume Amazon Kinesis Data Streams with many workers, without the JVM."""
