//! Prints the alarm-loader's golden vectors (`schemas/alarm-vectors.json`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let v = alarm_loader::vectors::compute()?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}
