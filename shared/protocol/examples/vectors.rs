//! Prints the golden vectors (`schemas/vectors.json`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let v = protocol::vectors::compute()?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}
