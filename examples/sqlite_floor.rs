//! Benchmark floor: SQLite's own rate for inserting N device-shaped rows (16 columns,
//! primary key (token_name, serial_number)) with one prepared statement in one
//! transaction, WAL and synchronous=NORMAL and the page cache adesync uses.
//! `sqlite_floor DB_FILE N`.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() == 3, "usage: sqlite_floor DB_FILE N");
    let n: u64 = args[2].parse()?;
    let mut conn = rusqlite::Connection::open(&args[1])?;
    // The same page cache adesync's store uses (see store.rs).
    let cache_kib: i64 = std::env::var("SQLITE_CACHE_KIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32 * 1024);
    conn.execute_batch(&format!("PRAGMA cache_size = -{cache_kib};"))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 4096;
         CREATE TABLE devices (token_name TEXT NOT NULL, serial_number TEXT NOT NULL, model TEXT,
           description TEXT, color TEXT, asset_tag TEXT, profile_status TEXT, profile_uuid TEXT,
           profile_assign_time TEXT, profile_push_time TEXT, device_assigned_date TEXT,
           device_assigned_by TEXT, os TEXT, device_family TEXT, first_seen_at TEXT, updated_at TEXT,
           PRIMARY KEY (token_name, serial_number));",
    )?;
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare(
            "INSERT INTO devices VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16)",
        )?;
        for i in 0..n {
            let serial = format!("C02{:09X}", i.wrapping_mul(2_654_435_761) % 0xF_FFFF_FFFF);
            stmt.execute(rusqlite::params![
                "bench",
                serial,
                "MacBook Air",
                "MBA 13.6 MIDNIGHT/8C CPU/8C GPU/8GB/256GB-USA",
                "MIDNIGHT",
                "AT12345",
                "assigned",
                "C1F123098EB5074580041E69883004C3",
                "2024-07-03T09:41:12Z",
                Option::<String>::None,
                "2024-07-03T09:40:00Z",
                "admin@example.com",
                "OSX",
                "Mac",
                "2026-11-26T10:00:00.000Z",
                "2026-11-26T10:00:00.000Z",
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}
